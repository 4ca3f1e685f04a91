"""What a run reads: finding the inputs (collection.py), latent files as PiD latents (latent_files.py), images and
their size plan (images.py, image_plan.py), prompts (prompts.py) and JSONL manifests (manifest.py)."""

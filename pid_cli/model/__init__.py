"""The PiD network and its weight files."""

from pid_cli.model.config import PiDConfig
from pid_cli.model.net import PiDNet
from pid_cli.model.weights import WeightsError, load_weights, read_state_dict

__all__ = ["PiDConfig", "PiDNet", "WeightsError", "load_weights", "read_state_dict"]

"""paratrain: train PyTorch models across processes and machines on torch.distributed."""

from paratrain.api import Trainer, init, parallelize
from paratrain.config import RunConfig, format_layout, parse_layout, validate
from paratrain.mesh import Mesh
from paratrain.parallel import DataParallel

__version__ = "0.1.0"
__all__ = ["RunConfig", "Mesh", "DataParallel", "Trainer", "init", "parallelize", "format_layout", "parse_layout",
           "validate"]

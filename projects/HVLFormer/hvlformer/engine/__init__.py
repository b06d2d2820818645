from .lr_scheduler import build_lr_scheduler
from .optimizer import build_optimizer, get_parameter_groups
from .train_loop import SemiSupervisedStep, TrainStep
from .trainer import Trainer

__all__ = ["build_lr_scheduler", "build_optimizer", "get_parameter_groups", "SemiSupervisedStep", "TrainStep",
           "Trainer"]

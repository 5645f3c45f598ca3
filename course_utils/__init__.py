"""course_utils — the companion package of the LLM Training Lab.

Plumbing shared by the notebooks (profiles, the offline tiny world, data, models,
training loops, checkpoints, tracking); each training stage has its own module
(``pretrain``, and later ``sft``, ``reward``, ``ppo``, ``dpo``, ...).
"""

from .errors import CheckpointError, ConfigError, CourseError, DataError
from .profiles import PROFILES, Profile, get_profile, runs_dir, use_profile

__version__ = "0.1.0"

__all__ = [
    "PROFILES", "Profile", "get_profile", "use_profile", "runs_dir",
    "CourseError", "ConfigError", "DataError", "CheckpointError",
]

"""course_utils — the companion package of the LLM Training Lab.

Plumbing shared by the notebooks (profiles, the offline tiny world, data, models,
training loops, checkpoints, tracking); each training stage has its own module
(``pretrain``, and later ``sft``, ``reward``, ``ppo``, ``dpo``, ...).
"""

import logging

from .errors import CheckpointError, ConfigError, CourseError, DataError
from .profiles import PROFILES, Profile, get_profile, runs_dir, use_profile

__version__ = "0.1.0"

# On CPUs with AVX512-BF16, bitsandbytes tries to fetch an optional 4-bit matmul kernel from the Hugging Face Hub
# (package `kernels`) and logs "Failed to load ..." without it. The course runs offline and does not need it.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "kernels-community" not in record.getMessage())

__all__ = [
    "PROFILES", "Profile", "get_profile", "use_profile", "runs_dir",
    "CourseError", "ConfigError", "DataError", "CheckpointError",
]

"""Errors the course raises on bad input.

Every error names the thing that is wrong (a file and line, a record index, a
config field) so a learner can fix it without reading a traceback. They subclass
``ValueError`` so generic ``except ValueError`` handlers keep working.
"""


class CourseError(ValueError):
    """Base class for every error the course raises on purpose."""


class ConfigError(CourseError):
    """A profile, config field or model shape is invalid."""


class DataError(CourseError):
    """A dataset record or file is malformed."""


class CheckpointError(CourseError):
    """A checkpoint folder is missing a file, or a file does not match its manifest."""

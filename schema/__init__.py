"""What a run's configuration may say: every key's type, default, one-line doc and allowed
values (``knob`` fields of dataclasses), checked in one place (``door``), and the error for a
value that is refused.

``ConfigError`` is a user's configuration mistake: raised wherever a setting is checked (the
schema, and what only the model or the data can tell: a rank above a layer's size, a label
outside a task's classes), with a message that names the key and the allowed values;
``run.py`` reports it in one line and exits 2.
"""

from .errors import ConfigError
from .fields import knob, problems
from .store import add_run_and_tasks, add_variant

add_run_and_tasks()

__all__ = ["ConfigError", "add_variant", "knob", "problems"]

"""The baselines: methods that add no module and fine-tune some of the model's own parameters
(``ParameterSubset``). Importing this package registers them."""

from .bitfit import BitFit
from .full import FullFineTuning
from .head import HeadOnly

__all__ = ["BitFit", "FullFineTuning", "HeadOnly"]

"""``import ivl.zoo``: the offline model zoo, an alias of :mod:`ivl.models.zoo`."""

import sys

from ivl.models import zoo as _zoo

sys.modules[__name__] = _zoo

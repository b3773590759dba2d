"""fippure: backdoor purification in JAX/Flax."""

__version__ = "0.1.0"

# The revision of the running code is taken now, at import: a long run's results name the code
# that produced them even if the checkout moves on meanwhile (fippure.provenance).
from fippure import provenance as _provenance  # noqa: E402, F401

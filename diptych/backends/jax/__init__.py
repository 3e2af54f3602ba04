"""The JAX panel: Flax NNX models, Optax, Orbax, Pallas kernels.

``JaxBackend`` says only how arrays cross the boundary; everything else routes to this
package's modules (``model``, ``recurrent``, ``sampler``, ``train``, ``checkpoint``), mirrored
file for file by ``diptych.backends.torch`` (see ``diptych.backends.facade``).
"""

from __future__ import annotations

import numpy as np

from diptych.backends.facade import Facade
from diptych.core.backend import Array


class JaxBackend(Facade):
    name = "jax"
    package = __name__

    def to_numpy(self, x: Array) -> np.ndarray:
        import jax.numpy as jnp

        x = jnp.asarray(x)
        if x.dtype == jnp.bfloat16:
            x = x.astype(jnp.float32)
        return np.asarray(x)

    def from_numpy(self, a: np.ndarray, dtype: str | None = None) -> Array:
        import jax.numpy as jnp

        return jnp.asarray(a, dtype=None if dtype is None else jnp.dtype(dtype))


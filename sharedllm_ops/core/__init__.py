"""The leaf of the package: what every backend shares, importing only torch and the reference.

* :mod:`.checks`: argument checks of every op, one message per error;
* :mod:`.registration`: fake kernels and autograd, once per op namespace;
* :mod:`.dispatch`: the backend registry and ``backend="auto"``;
* :mod:`.versions`: version parsing for the compatibility checks.

``sharedllm_ops.ops`` (the public functions), ``sharedllm_ops._ext`` (the C++/CUDA extension) and
``sharedllm_ops.triton`` each import this package and none of the others.
"""

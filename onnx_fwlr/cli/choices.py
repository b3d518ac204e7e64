"""The names the command line offers as choices, without importing the library that implements them (so
that --help answers at once). tests/test_cli_startup.py checks them against the library's registries."""

METHODS = ("svd", "asvd", "whiten", "fwsvd", "kfac", "kron")  # methods.registry.METHODS
ALLOCATIONS = ("uniform", "global")  # pipeline.budget.ALLOCATIONS
REFINE_LOSSES = ("mse", "kl")  # refine.losses.LOSSES
SCHEDULES = ("cosine", "linear")  # refine.optim.SCHEDULES

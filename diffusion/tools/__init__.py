"""Tools over the whole framework (the benchmark); nothing in the package imports them."""

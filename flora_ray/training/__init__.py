"""Training: one loop for every task (dense teacher, supernet, the filter's local supernets), optimiser and
schedule, stateless per-step subnet sampling."""

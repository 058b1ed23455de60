"""Test and benchmark harnesses (never imported by the library): a local autoscaling cluster, fault injection."""

"""What runs the stages: ``local`` (this process, no Ray) and ``ray`` (Ray Train, tasks and Tune), both
implementing ``base.Backend``. Stages never import Ray; only ``ray`` and ``ray_tune`` do."""

"""The FLORA core: model surgery and everything that is a pure function of a model and its ranks.

``lowrank`` (the elastic low-rank layer, one break-even rule) -> ``models`` (timm creation, weights) ->
``surgery`` (module swap, targets from ``flora_ray.core.families``) -> ``space`` (immutable rank space) -> ``cost``
(exact MACs, token geometry from the family) -> ``supernet`` -> ``subnet`` (static export); ``inspection`` lays a
configuration out layer by layer. Nothing here knows about runs, Ray or files other than the one it is handed.
"""

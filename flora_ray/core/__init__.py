"""The FLORA core: model surgery and everything that is a pure function of a model and its ranks.

``lowrank`` (the elastic low-rank layer, one break-even rule) -> ``models`` (timm creation, weights) ->
``surgery`` (module swap) -> ``space`` (immutable rank space) -> ``cost`` (exact MACs) -> ``supernet`` ->
``subnet`` (static export). Nothing here knows about runs, Ray or files other than the one it is handed.
"""

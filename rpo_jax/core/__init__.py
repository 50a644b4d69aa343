"""The bottom layer: configs, the device mesh, atomic files and image files.

``config`` (ml_collections helpers, one JSON converter), ``partitioning`` (the ('data', 'fsdp',
'tensor') mesh and logical-axis rules), ``fsutil`` (atomic files and folders), ``images``
(reading and writing photos with clear errors). Imports nothing else from rpo_jax.
"""

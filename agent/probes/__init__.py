"""What the device is and what it draws: power sources, the power sampler, device and memory facts.

Every reading comes from a filesystem root that stands for ``/`` (``probes.sysfs_root``), so a copied or
generated tree is read exactly like the real one; that is how the tests run on machines without sensors.
"""

"""Built-in plugins, one subpackage per method or component family.

Each is registered through the `geopeft` entry-point group, exactly as a
third-party plugin is; plugins never import one another.
"""

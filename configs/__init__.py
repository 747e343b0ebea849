"""Configuration and run plumbing: schemas, registries, errors, run directories, logging.

The yaml tree of Hydra lives beside this file (`configs/*.yaml`, `configs/<group>/*.yaml`).
"""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent

"""The Observation layer: build training data from medical archives (DATA.md).

``unimedvl data build CONFIG --out DIR`` turns the sources of a YAML config into sharded Parquet
records of the three task families, with quality control and de-identification.
"""

from .schema import FAMILIES, MODALITIES, Record, Rejection

__all__ = ["FAMILIES", "MODALITIES", "Record", "Rejection"]

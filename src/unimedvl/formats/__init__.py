"""Files the project reads and writes: the official checkpoint layout, medical images (DICOM, NIfTI,
rasters), generated outputs marked synthetic, annotation tables, charts, and atomic writes.

Nothing here trains or runs the model; each module knows one format.
"""

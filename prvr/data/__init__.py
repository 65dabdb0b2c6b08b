"""Datasets and file formats: captions, the MS-SL/DL-DKD release layout."""

"""prvr: Partially Relevant Video Retrieval (DL-DKD++) end to end."""
__version__ = "0.1.0"

"""membrane's services; each one is a package with a small face (``service.py``)."""

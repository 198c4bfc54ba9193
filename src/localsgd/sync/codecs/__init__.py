"""Codecs for compressed communication: one file per ``sync.compression.method``.

Pure tensor code, no process group: a codec encodes a flat bucket into a payload of a few
tensors and decodes any rank's payload back into a dense bucket; ``ErrorFeedback`` keeps
what compression dropped and adds it to the next bucket. Each file registers its codecs in
``CODECS`` (``base.py``), so adding a codec is adding a file.
"""

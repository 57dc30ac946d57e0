"""One file per schema revision, applied in order by ``alignloop db upgrade``."""

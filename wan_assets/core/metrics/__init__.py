"""The metrics stage: the DuckDB metrics database that run folders are loaded into, the reports read
from it, and the per-run summary. The last stage: it reads what train and eval write, and no other
stage imports it. Nothing is re-exported here.
"""

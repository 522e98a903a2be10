"""MLflow tracking, one room per job:

- store.py   where runs live: the tracking URI, its checks, clients, the store and the experiment
- logger.py  one run as the pipeline writes it: identity and resume, logging, offline replay, the
             nested EMA-reconstruction runs
- runs.py    reading runs back for tables (`pipeline runs`, sweep tables)

The tracking server for many writers is pipeline/tracking_server.py. Import from the module that
holds a name; this file imports nothing.
"""

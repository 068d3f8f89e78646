"""Deployment: SuperLink + SuperNodes on devices running the same ServerApp and ClientApp.

- `supernode`: ``fedkd-supernode``, Flower's SuperNode with short polls and a persistent worker;
- `worker`: the SuperExec executor that serves every message in one ClientApp process.
"""

"""Run by Python at start-up in the processes that the tests launch with conftest.TINY_ENV
(``PYTHONPATH``): registers the tiny test splits there, including in the train_net.py runs that
tools/demo.py starts in turn, which no test code reaches."""

from tiny_datasets import register_tiny_datasets

register_tiny_datasets()

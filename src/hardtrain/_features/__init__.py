"""The features that join the loop through ``hardtrain._loop.protocol``, one module each.

A feature module imports the protocol and the loop's parts, the policies and the
standalone components (store, guard, watch), never another feature or the trainer;
``tests/test_architecture.py`` holds them to it.
"""

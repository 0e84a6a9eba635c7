"""Policies suggested from observed flows (``l7proxy policy suggest``).

``observed`` reads flow-log records into typed observations, ``paths``
generalises HTTP paths, ``draft`` builds one policy per endpoint, ``render``
writes CiliumNetworkPolicy YAML with comments, ``check`` replays every
observation through the real decision code, and ``suggest`` runs them in order.
"""

"""The Ray Serve edge: matrix models, the policy and the judge as deployments, with a REST API.

``app`` builds and deploys them from a run config (``build_app``, ``deploy``, ``swap_checkpoint``),
``deployments`` holds the handle-level API, ``ingress`` the REST API, ``judge`` the scoring logic
(no Ray, also used in one process), ``commands`` the ``tso serve`` command. See docs/serving.md.
"""

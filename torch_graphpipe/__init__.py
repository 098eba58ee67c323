"""torch_graphpipe: graph pipeline-parallel training (stages form a DAG, not a chain).

Not implemented yet: see the project's issues.
"""

__all__: list[str] = []

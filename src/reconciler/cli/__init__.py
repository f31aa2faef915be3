"""The command line: validate, plan, apply, destroy, graph, status, schema."""

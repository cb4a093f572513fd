"""Shared test helpers: the one tiny project/params/model factory (`tiny`), project builders
(`projects`) and MLflow fixtures (`tracking`). Test modules import from here, never from each other."""

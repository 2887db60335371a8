"""The outputs layer: the snippet, the recommendation, the export and the report."""

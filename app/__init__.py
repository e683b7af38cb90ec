"""MVAR Studio's Gradio app: layout.py (the page), handlers.py (event handlers), plots.py (figures),
analysis.py (attention statistics), registry.py (which models are available, and the loaded ones)."""

"""The runs page (code in cascade_studio/ui/page_runs.py)."""
from cascade_studio.ui.page_runs import render

render()

"""The recipes page (code in cascade_studio/ui/page_recipes.py)."""
from cascade_studio.ui.page_recipes import render

render()

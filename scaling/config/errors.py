"""The one exception a recipe mistake raises."""


class RecipeError(ValueError):
    """A user mistake in a recipe or an override; the message is one line."""

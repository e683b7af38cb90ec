"""MVAR Studio's Gradio app.

The page, one module per part (each holds its widgets, its events and its record-to-view functions):
``page.py`` (the top of the page, the model choice, ``build_app``), ``generate.py``, ``attention.py``,
``ablation.py``, ``edit.py``, ``analysis.py`` (Analysis, Memory, Cost per scale) and ``api.py`` (the named
API); ``widgets.py`` (what the parts share), ``plots.py`` (figures and images).

Below them: ``services.py`` (what every event works with), ``policy.py`` (refusals, failures, the time
limit), ``store.py`` (the generations kept for the views), ``image_files.py`` (the PNG files the browser
fetches), ``tasks.py`` and ``zerogpu.py`` (where the model work runs), ``registry.py`` and ``provenance.py``
(the models offered, and what each file was trained for), ``dataset_samples.py`` (the Edit tab's sample
images), ``space.py`` (``python -m app.space``: a Space folder) and ``imagenet_classes.json``.

``work/``: the model work, with no Gradio: ``settings.py`` (every input's range, parsed once),
``models.py``, ``generation.py``, ``statistics.py``, ``ablation.py``, ``costs.py`` and ``editing.py``.
"""

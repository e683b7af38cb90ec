"""The app's model work, with no Gradio: plain values in (a model key, checked settings), data out (numpy
images, CPU tensors, records). ``settings.py`` parses what the user asked for, once; ``models.py`` loads and
places models; ``generation.py``, ``statistics.py``, ``ablation.py``, ``costs.py`` and ``editing.py`` run them."""

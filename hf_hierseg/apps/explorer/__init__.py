"""The hierarchy explorer: a web page (Gradio) where a click on a region shows its parts and wholes.

    hf-hierseg serve [--model DIR|HUB_ID] [--host 127.0.0.1] [--port 7860]
    hf-hierseg export-space DIR [--model DIR|HUB_ID]      the same app as a Hugging Face Space

- `analysis`: what is computed and drawn for one image (no web framework; tested on its own);
- `app`: the Gradio page and its server (imports gradio, the `demo` extra);
- `command`: the two subcommands (`serve` imports the page only when it runs);
- `space`: the files of a Space.

Importing this package does not import gradio.
"""

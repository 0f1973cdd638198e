"""Evaluators: LVIS chunked / Fixed AP, Flickr30k recall, RefCOCO accuracy, retrieval recall."""

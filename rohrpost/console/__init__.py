"""The operators' web console: dead letters, history, tenants and an audit, in the browser.

A server-rendered Starlette app over the same ``rohrpost.operations`` API the command
line uses. Every request has one actor (a logged-in user or an API token), every
permission check goes through ``permission_allowed``, and each page is a view that
builds a plain dict which the HTML template and the JSON API (``/api/v1``) both render.
"""

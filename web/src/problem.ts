import { ApiError, TOKEN_KEY, token } from './api.js';
import { h } from './dom.js';
import { reconnectLive } from './live.js';

/**
 * What a page shows instead of its data when the API said no: a coordinator that is not public asks for a token
 * (kept in this browser's localStorage; where GitHub login is offered, the header links to it); anything else is the
 * API's own message.
 */
export function problem(err: unknown, retry: () => void): HTMLElement {
  if (err instanceof ApiError && (err.status === 401 || err.status === 403)) return tokenForm(err, retry);
  const message = err instanceof ApiError ? `${err.message} (${err.code})` : String(err);
  return h('div', { class: 'problem', role: 'alert' }, h('p', null, message));
}

function tokenForm(err: ApiError, retry: () => void): HTMLElement {
  const input = h('input', {
    type: 'password',
    name: 'token',
    autocomplete: 'off',
    placeholder: 'API token',
    'aria-label': 'API token',
  });
  const form = h(
    'form',
    { class: 'problem token-form', role: 'alert' },
    h('p', null, err.message),
    token() ? h('p', null, 'The token this browser holds was not accepted.') : null,
    h('div', { class: 'row' }, input, h('button', { type: 'submit' }, 'Use this token')),
  );
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const value = input.value.trim();
    if (value === '') localStorage.removeItem(TOKEN_KEY);
    else localStorage.setItem(TOKEN_KEY, value);
    reconnectLive();
    retry();
  });
  return form;
}

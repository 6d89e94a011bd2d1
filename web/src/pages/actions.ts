import { ApiError, token } from '../api.js';
import { h } from '../dom.js';

/**
 * A button that asks the API to do something (cancel, rebuild, drain, resume) and says how that went beside it: the
 * API's own message when it refuses. Shown to everyone: with OAuth a session may act without a token in this browser,
 * and whoever may not is told so by the coordinator, not guessed at here.
 */
export function actionButton(
  label: string,
  act: () => Promise<unknown>,
  options: { name: string; done?: () => void },
): HTMLElement {
  const message = h('span', { class: 'action-message', role: 'status' });
  const button = h(
    'button',
    {
      type: 'button',
      class: 'action',
      'data-action': options.name,
      title: token() ? undefined : 'Needs an API token (or a login) that may do this',
    },
    label,
  );
  button.addEventListener('click', () => {
    button.disabled = true;
    message.textContent = '';
    delete message.dataset.state;
    void act()
      .then(() => {
        message.dataset.state = 'done';
        message.textContent = 'Done.';
        options.done?.();
      })
      .catch((err: unknown) => {
        message.dataset.state = 'error';
        message.setAttribute('role', 'alert');
        message.textContent = err instanceof ApiError ? `${err.message} (${err.status})` : String(err);
      })
      .finally(() => {
        button.disabled = false;
      });
  });
  return h('span', { class: 'action-group' }, button, message);
}

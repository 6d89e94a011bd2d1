import tseslint from 'typescript-eslint';
import importX, { createNodeResolver } from 'eslint-plugin-import-x';

// agent/ and coordinator/ talk only through common/ (and the wire); this keeps either side deployable alone.
const boundary = (...others) => ({
  'no-restricted-imports': [
    'error',
    {
      patterns: others.map((other) => ({
        regex: `^(\\.\\./)+${other}/`,
        message: `import from common/ only, never from ${other}/`,
      })),
    },
  ],
});

export default tseslint.config(
  { ignores: ['dist/**', 'node_modules/**', 'common/proto/**', 'bin/**', '.bench/**'] },
  ...tseslint.configs.recommendedTypeChecked,
  {
    languageOptions: { parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname } },
    plugins: { 'import-x': importX },
    // TypeScript sources import each other with `.js` suffixes; the node resolver maps them back to `.ts`.
    settings: {
      'import-x/resolver-next': [createNodeResolver({ extensionAlias: { '.js': ['.ts', '.js'] } })],
      // no-cycle follows imports into other files, which it must parse as TypeScript.
      'import-x/parsers': { '@typescript-eslint/parser': ['.ts'] },
      'import-x/extensions': ['.ts', '.js'],
    },
    rules: {
      '@typescript-eslint/no-floating-promises': 'error',
      '@typescript-eslint/no-misused-promises': ['error', { checksVoidReturn: { arguments: false } }],
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_' }],
      '@typescript-eslint/restrict-template-expressions': ['error', { allowNumber: true, allowBoolean: true }],
      'import-x/no-cycle': 'error',
    },
  },
  { files: ['agent/**/*.ts'], rules: boundary('coordinator', 'cli') },
  { files: ['coordinator/**/*.ts'], rules: boundary('agent', 'cli') },
  { files: ['common/**/*.ts'], rules: boundary('agent', 'coordinator', 'cli') },
  { files: ['eslint.config.js', 'vitest.config.ts'], ...tseslint.configs.disableTypeChecked },
);

/*
 * Runs on pages with saved widget state, after RequireJS and before the Jupyter widget manager
 * (see nb_ipywidgets_js in _config.yml).  scripts/build_book.sh copies it to
 * _static/offline/ in the built site, next to the folders it refers to.
 *
 * 1. The widget manager (an AMD bundle) works out where its stylesheet's icon fonts live from the
 *    RequireJS address of its own module.  Without a path for that module, RequireJS places it
 *    relative to the page, and the fonts are requested from folders that do not exist.
 * 2. The widget controls typeset their labels with MathJax 2's `MathJax.Hub.Queue`.  The book
 *    uses MathJax 3, which has no `Hub`; calling it throws.  A small stand-in queues the same
 *    work through MathJax 3's `typesetPromise`.
 */
(function () {
  "use strict";

  var self = document.currentScript;
  if (window.requirejs && self && self.src) {
    window.requirejs.config({
      paths: {
        "@jupyter-widgets/html-manager/dist": new URL("html-manager/dist", self.src).href,
      },
    });
  }

  var waiting = [];

  function typeset(elements) {
    var mj = window.MathJax;
    if (mj && mj.startup && mj.startup.promise && typeof mj.typesetPromise === "function") {
      mj.startup.promise = mj.startup.promise
        .then(function () { return mj.typesetPromise(elements); })
        .catch(function (err) { console.warn("MathJax could not typeset a widget label:", err); });
    } else {
      Array.prototype.push.apply(waiting, elements);
    }
  }

  var hub = {
    Queue: function () {
      for (var i = 0; i < arguments.length; i++) {
        var job = arguments[i];
        if (Array.isArray(job) && job[0] === "Typeset" && job[2]) {
          typeset([job[2]]);
        }
      }
    },
  };

  function install() {
    if (window.MathJax && !window.MathJax.Hub) {
      window.MathJax.Hub = hub;
    }
  }

  // Until MathJax 3 has loaded, window.MathJax is its configuration object (pages with
  // equations) or absent (pages without, where the widgets skip typesetting).
  install();
  var config = window.MathJax;
  if (config && !config.version) {
    config.startup = config.startup || {};
    var ready = config.startup.ready;
    config.startup.ready = function () {
      if (typeof ready === "function") {
        ready();
      } else {
        window.MathJax.startup.defaultReady();
      }
      install();
      if (waiting.length) {
        typeset(waiting.splice(0));
      }
    };
  }
})();
